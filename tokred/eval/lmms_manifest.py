"""What the ``lmms_eval.models`` entry point names: the ``tokred`` model's manifest, and nothing else.

Kept apart from `tokred.eval.lmms` so that lmms-eval can read it while that module is still importing
(importing it imports lmms-eval, which builds its model registry and reads the entry points).
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="tokred", chat_class_path="tokred.eval.lmms.Tokred")
