import sys

from fishmerge.cli.main import main

sys.exit(main())
