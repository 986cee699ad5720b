"""The BentoML service of the exported model (``serving.service:Classifier``) and its parts."""

import os

# Usage tracking off before BentoML reads it (it caches the answer): `bentoml serve` imports
# this package in its main process before it would send anything.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
