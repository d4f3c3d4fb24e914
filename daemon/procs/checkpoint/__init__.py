"""CRIU checkpoints: a waiting run's process is dumped to disk and restored when it resumes.

The protocol (measured in ``shared/research/criu-python.md``): the run process closes every
socket and parks on SIGUSR1 (``Suspend``); the daemon dumps it with ``criu dump --tcp-close``
into a 0700 directory (which kills it) and frees everything it held. To resume, ``criu
restore -d -S`` brings it back as a child of the daemon, SIGUSR1 wakes it, and it reconnects
with its old worker id and token. Run processes live as PID 1 of their own PID namespace,
so a restore never collides with a PID taken meanwhile. Images are single-use and deleted
after the restored process says hello. When a dump fails, CRIU leaves the process running:
it is woken and simply stays parked; when a restore fails, the run re-executes from its
journal instead.

The modules, along a checkpoint's life: :mod:`.support` (whether CRIU works here: the
binary, its version, a smoke test), :mod:`.criu` (running criu), :mod:`.context` (what the
parts share), :mod:`.dumps`, :mod:`.restores`, :mod:`.ahead` (restores ahead of a deadline)
and :mod:`.plan` (their slots and schedule), :mod:`.images` (the image folders),
:mod:`.pages` (their pages, packed against a shared base) and :mod:`.manifest` (what an image
needs of the machine it is restored on); :mod:`.checkpointer` is the façade the daemon uses.
"""
