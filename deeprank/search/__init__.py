"""Searching a gallery by image: searcher (a checkpoint and a gallery), index (exact or faiss) and
web (the search page); image_search.py drives them from the shell."""
