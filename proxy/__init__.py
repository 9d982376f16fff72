"""joulegate: per-request GPU energy metering for inference APIs."""

__version__ = "0.1.0"
