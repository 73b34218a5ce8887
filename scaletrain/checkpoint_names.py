"""Names inside a run's checkpoints/ dir, without torch: tools that only look (runs, --out checks) import this."""

import re

TAG_RE = re.compile(r"^global_step(\d+)$")  # one checkpoint: checkpoints/global_step<N>/
MANIFEST = "manifest.json"  # written last into a tag: its files' sizes and sha256; a tag without it is incomplete
