"""Using a trained model as a search engine: ``embed`` a video library into an index, ``search`` it with
text or a video, ``serve`` a search page (:mod:`.embed`, :mod:`.index`, :mod:`.serve`)."""
from .index import Index

__all__ = ["Index"]
