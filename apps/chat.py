"""Chat with a trained YuLan in the browser: `python apps/chat.py --model DIR [--compare OTHER]`.

The same as `yulan-tune app ...`; everything reusable (loading, streaming, the gradio UI) lives in yulan_tune/app.py
and yulan_tune/chat_session.py. Without --model it serves the quickstart's output (`make quickstart`).
"""

import sys

from yulan_tune.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["app", *sys.argv[1:]]))
