"""Carbon: grid intensity at each request's time, facility energy by PUE, end to end."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from proxy.carbon import CarbonConfigError, CarbonModel, IntensitySeries
from proxy.config import ConfigError, load_config
from proxy.server import RECORDER
from tests.fake_openai import create_fake_openai
from tests.servers import joulegate, metric_series, serve, settled

ELECTRICITY_MAPS = (
    (
        "Datetime (UTC),Country,Zone Name,Zone Id,Carbon Intensity gCO₂eq/kWh (direct),"
        "Carbon Intensity gCO₂eq/kWh (LCA),Low Carbon Percentage,Renewable Percentage,"
        "Data Source,Data Estimated,Data Estimation Method\n"
    )
    + """2026-11-25 00:00:00,Germany,Germany,DE,300.5,350.0,50,40,x,false,
2026-11-25 01:00:00,Germany,Germany,DE,310.0,360.0,50,40,x,false,
2026-11-25 02:00:00,Germany,Germany,DE,,,50,40,x,false,
2026-11-25 03:00:00,Germany,Germany,DE,320.0,370.0,50,40,x,false,
"""
)


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_electricity_maps_export_is_read_hour_by_hour(tmp_path: Path) -> None:
    path = tmp_path / "de.csv"
    path.write_text(ELECTRICITY_MAPS)
    series = IntensitySeries.from_csv(path)
    assert series.step == 3600
    assert series.at(_at("2026-11-25 00:30:00")) == 350.0  # life-cycle column preferred
    assert series.at(_at("2026-11-25 01:59:59")) == 360.0
    assert series.at(_at("2026-11-25 02:30:00")) is None  # a missing hour stays unknown
    assert series.at(_at("2026-11-25 03:10:00")) == 370.0
    assert series.at(_at("2026-11-24 23:59:00")) is None  # before the series
    assert series.at(_at("2026-11-25 04:00:00")) is None  # after its last hour


def test_watttime_pounds_per_megawatt_hour(tmp_path: Path) -> None:
    path = tmp_path / "moer.csv"
    path.write_text("point_time,value\n2026-11-25T00:00:00Z,1000\n2026-11-25T01:00:00Z,500\n")
    series = IntensitySeries.from_csv(path, unit="lbs_per_mwh")
    assert series.at(_at("2026-11-25 00:10:00")) == pytest.approx(453.59237)
    assert series.at(_at("2026-11-25 01:10:00")) == pytest.approx(226.796185)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("when,how much\n1,2\n", "needs a time column"),
        ("datetime,value\nyesterday,3\n", "line 2"),
        ("datetime,value\n2026-01-01T00:00:00,-3\n", "negative"),
        ("datetime,value\n2026-01-01T00:00:00,\n", "no rows"),
    ],
)
def test_bad_intensity_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(CarbonConfigError, match=message):
        IntensitySeries.from_csv(path)
    with pytest.raises(ConfigError, match="carbon_intensity"):
        load_config(environ={}, overrides={"carbon_intensity": str(path)})


def test_footprint_is_energy_times_pue_times_intensity() -> None:
    footprint = CarbonModel(pue=1.5, intensity=400.0).footprint(3.6e6, time.time())
    assert footprint.facility_energy_joules == 5.4e6
    assert footprint.carbon_grams == pytest.approx(600.0)  # 1.5 kWh x 400 g/kWh
    unknown = CarbonModel(pue=1.2).footprint(3.6e6, time.time())
    assert unknown.carbon_grams is None and unknown.facility_energy_joules == pytest.approx(4.32e6)
    with pytest.raises(ValueError):
        CarbonModel(pue=0.9)


async def test_records_and_metrics_carry_carbon_from_the_series(tmp_path: Path) -> None:
    now = time.time()
    hour = now - now % 3600
    path = tmp_path / "grid.csv"
    path.write_text(f"timestamp,value\n{hour - 3600:.0f},999\n{hour:.0f},250\n")
    settings = {"carbon_intensity": str(path), "pue": 1.2, "sample_interval_seconds": 0.02}
    async with (
        serve(create_fake_openai()) as upstream,
        joulegate(upstream, **settings) as (
            proxy,
            app,
        ),
    ):
        async with aiohttp.ClientSession() as client:
            async with client.post(
                proxy + "/v1/embeddings", json={"model": "m", "input": "x"}
            ) as response:
                request_id = response.headers["X-Request-Id"]
            await settled(app)
            async with client.get(proxy + "/metrics") as response:
                exposition = await response.text()
        record = app[RECORDER].store.get(request_id)
    assert record is not None and record.energy_joules is not None
    assert record.carbon_intensity_g_per_kwh == 250.0
    assert record.facility_energy_joules == pytest.approx(record.energy_joules * 1.2)
    assert record.carbon_grams == pytest.approx(record.energy_joules * 1.2 / 3.6e6 * 250.0)
    carbon = metric_series(exposition, "joulegate_carbon_grams_total")
    assert carbon == {
        '{model="m",task="embeddings",tenant="anonymous"}': pytest.approx(record.carbon_grams)
    }
