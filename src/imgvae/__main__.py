import sys

from imgvae.commands.cli import main

sys.exit(main())
