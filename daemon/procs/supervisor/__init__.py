"""The supervisor: one warm zygote per version, and the run processes forked from it.

:mod:`.core` is the façade the daemon, the engine and the checkpointer talk to; the parts
beside it are listed in its docstring.
"""

from ember.daemon.procs.supervisor.context import SupervisorEngine
from ember.daemon.procs.supervisor.core import Supervisor
from ember.daemon.procs.supervisor.exits import describe_exit

__all__ = ["Supervisor", "SupervisorEngine", "describe_exit"]
