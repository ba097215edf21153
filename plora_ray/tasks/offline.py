"""No dataset hub is reachable from this project's machines: tell ``datasets`` and the hub client.

Imported first by ``plora_ray.tasks``, before anything there loads lm-eval (which loads
``datasets`` and ``huggingface_hub``, both of which read these switches when first imported), so
no evaluation ever waits on a hub.
"""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
