from .tiny_t2i import load_tiny
