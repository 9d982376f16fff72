"""joulegate's model server: an OpenAI-compatible aiohttp server over transformers/diffusers.

OpenMP threads that have finished a CPU operator normally spin for a while waiting for the
next one. With one inference thread per device (and the event loop beside them) the idle
teams' spinning starves the busy one on a small machine and burns energy that a meter would
then attribute to requests. Passive waiting is set here, before torch can be imported; an
explicit ``OMP_WAIT_POLICY`` in the environment wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
