"""What both daemons' HTTP needs: the error table and its rendering (``errors``,
``responses``), reading requests (``requests``), limits (``guards``, ``listener``), host
and origin checks (``hosts``), and the access gate (``gate``)."""
