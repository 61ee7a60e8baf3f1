"""C++ sources of fastprompt and how they are built (``build``): ahead of time by ``setup.py`` when torch is
present at build time, else with ninja on first use (``fastprompt.attention.cpu_backend``)."""
