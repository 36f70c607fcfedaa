"""Container health check: exit 0 when the server's /readyz answers 200, 1 otherwise.

/readyz answers 503 until the model is loaded and the generation worker runs; a full
server ("status": "full") is still healthy. Reads KNOTSTREAM_PORT (default 8000);
KNOTSTREAM_HEALTH_URL overrides the whole URL. Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = os.environ.get("KNOTSTREAM_HEALTH_URL") or f"http://127.0.0.1:{os.environ.get('KNOTSTREAM_PORT', '8000')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            print(f"{url}: {resp.status} {resp.read(200).decode(errors='replace')}")
            return 0 if resp.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"{url}: {exc.code} {exc.read(200).decode(errors='replace')}")
    except OSError as exc:
        print(f"{url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
