"""``python -m txvmbot``: the same as the ``txvmbot`` command."""

from txvmbot.cli import main

if __name__ == "__main__":
    main()
