"""Image build step: load the embedded default backbone once so its GGUF generator is converted at build time.

    python deploy/preload.py /opt/ragadapt/models

The conversion (~13 s) then lives in the image under the given cache directory, and containers that set
RAGADAPT_BACKBONE__CACHE_DIR to it start in seconds. Prints the backbone's fingerprint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from backbone import Backbone, embedded_default_config


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    # CPU here: the build host has no GPU, and the converted weights do not depend on the device.
    backbone = Backbone.load(embedded_default_config(cache_dir=Path(argv[0]), device="cpu"))
    print(backbone.fingerprint)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
