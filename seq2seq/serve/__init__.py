"""`seq2seq serve`: the models over HTTP (FastAPI on uvicorn, the `[serve]` extra) and a page to
try them in a browser. `server` runs it, `app` holds the routes, `workers` the batching across
requests, `models` the loading; `page.html` is the page."""
