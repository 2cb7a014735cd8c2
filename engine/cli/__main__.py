import sys

from tasklease.engine.cli.main import main

sys.exit(main())
