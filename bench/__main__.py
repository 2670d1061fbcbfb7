"""Run every benchmark in bench/ (`make bench`)."""

from . import fakebooru

if __name__ == "__main__":
    fakebooru.main()
