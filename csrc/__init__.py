"""C++ sources of fastprompt, compiled with ninja on first use (see ``fastprompt._cpp``)."""
