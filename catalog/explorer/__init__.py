"""The circuit explorer: a local, read-only web app over a catalogue (`cli.py serve`).

    from catalog.explorer import create_app
    app = create_app("catalog")            # a Flask app; serve(app) runs it on 127.0.0.1

Every page reads the catalogue through `Catalog.sql`, the read-only, sandboxed path of
`cli.py query`; the pictures are `catalog.render`'s SVG with a threshold slider and node
dashboards on top. Nothing is loaded from a network: the script and style are in the package.
"""

from catalog.explorer.app import bind, create_app, serve, url_of

__all__ = ["bind", "create_app", "serve", "url_of"]
