import sys

from dpcap.cli import main

sys.exit(main())
