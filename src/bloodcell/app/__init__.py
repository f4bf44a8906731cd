"""App: the command line (a table of commands over the library's functions), the HTTP server and
the review page's assets. Imports: every layer."""
