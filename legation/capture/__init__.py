"""Transparent traffic capture: apps unaware of their sidecars, the way a pod's are.

``legation up --capture`` runs each app instance with its sidecar in a network namespace that
Legation creates (a veth pair to a bridge Legation owns), and installs capture rules inside that
namespace in the spirit of Istio's init container: inbound TCP to the app's ports goes to the
sidecar's inbound listener, the app's outbound TCP to the sidecar's outbound (original
destination) listener, Envoy's own traffic is excluded by its group id.

* :mod:`~legation.capture.errors`: the package's one error type (:class:`CaptureError`);
* :mod:`~legation.capture.netns`: the bridge and the pods (namespace, veth pair, address, hosts
  file), named by a tag of the range; what capture needs; a crashed run's leftovers removed;
* :mod:`~legation.capture.rules`: a pod's ``iptables-restore`` input and its hosts file;
* :mod:`~legation.capture.pods`: ``legation up``'s pods following the mesh, and the relay
  (:mod:`~legation.capture.relay`) that lets the sidecars reach the host's loopback services;
* :mod:`~legation.capture.ebpf`: the eBPF acceleration (``--ebpf``), sockops + sk_msg.
"""

from legation.capture.errors import CaptureError

__all__ = ["CaptureError"]
