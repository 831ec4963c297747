"""eBPF acceleration for the mesh (``--ebpf``): same-host socket pairs spliced by a sockmap.

* ``sockmap.bpf.c``: the sockops program (records established TCP sockets of the mesh's cgroup in
  a sockhash) and the sk_msg program (sends a message straight to the recorded peer socket);
* :mod:`~legation.capture.ebpf.sockmap`: :class:`Sockmap`, which builds, loads, attaches and removes
  them, only on a cgroup v2 Legation creates;
* :mod:`~legation.capture.ebpf.redirect`: with ``--capture``, connect-time redirection
  (cgroup/connect4 and cgroup/getsockopt programs in the same object) so an app's hop to its
  sidecar has no NAT and is spliced too;
* :func:`missing_features`: what this machine lacks for ``--ebpf`` (root, clang, libbpf-dev,
  bpftool, cgroup v2, kernel program/map types and helpers), so ``--ebpf`` refuses with a message
  naming it.
"""

from legation.capture.ebpf._build import build_object
from legation.capture.ebpf._kernel import missing_features
from legation.capture.ebpf.sockmap import Sockmap

__all__ = ["Sockmap", "build_object", "missing_features"]
