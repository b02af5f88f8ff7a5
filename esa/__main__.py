"""``python -m esa`` is the ``esa`` command (so ``torchrun -m esa ...`` can launch it)."""

from esa.cli.main import main

if __name__ == "__main__":
    main()
