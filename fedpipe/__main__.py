import sys

from fedpipe.cli import main

sys.exit(main())
