"""``dreamlip serve``: see what a model learnt, on a local web page over an image collection.

:mod:`.index` reads the collection, caches its embeddings and searches them; :mod:`.readouts`
loads a model and gives its heatmaps and segmentation maps; :mod:`.app` is the web app and the
command. The page itself is ``static/`` (plain HTML, JS and CSS). See docs/serve.md.
"""
