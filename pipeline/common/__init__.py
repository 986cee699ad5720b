"""What the stages and the service share: the contract, image pixels, CPUs, colours, errors, atomic files.

Stdlib, numpy, Pillow and pydantic only: the Bento ships this package whole."""
