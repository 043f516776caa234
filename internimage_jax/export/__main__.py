import sys

from internimage_jax.export.command import main

sys.exit(main())
