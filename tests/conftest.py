"""Import the triton backend first: it decides, before Triton itself is
imported, whether Triton's library runs interpreted (no GPU) or compiled."""
import convdsl.triton  # noqa: F401
