"""Start the lab: `python app.py [--host 127.0.0.1] [--port 7860] [--db URL] [--model M] [--auth user:pass]`."""

import sys

if __name__ == "__main__":
    from lab.app import main

    sys.exit(main())
