import sys

from beechat.cli import main

sys.exit(main())
