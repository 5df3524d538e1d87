"""Chat with a trained YuLan in the browser: `python apps/chat.py --model DIR [--compare OTHER]`.

The same as `yulan-tune app ...`; everything reusable (loading, streaming, the gradio UI) lives in yulan_tune/app.py.
Without --model it serves the quickstart's output (`make quickstart`).
"""

from yulan_tune.app import app_main

if __name__ == "__main__":
    raise SystemExit(app_main())
