"""The dashboard's static files (static/): the page, its scripts and styles, and the vendored uPlot and Swagger UI."""
