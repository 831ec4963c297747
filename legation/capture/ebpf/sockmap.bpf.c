// SPDX-License-Identifier: GPL-2.0
// Legation's same-host socket splice (merbridge's idea), built by clang at first use.
//
// legation_sockops (sock_ops, attached to Legation's own cgroup v2 only): when a TCP socket of a
// process in that cgroup reaches ESTABLISHED (active or passive side), record it in
// legation_pairs under its 4-tuple and network namespace cookie.
//
// legation_msg (sk_msg, attached to legation_pairs as its msg_verdict): when a recorded socket
// sends, look up the peer socket (the mirrored 4-tuple in the same network namespace) and, if it
// is recorded too, put the bytes straight into the peer's receive queue (BPF_F_INGRESS), skipping
// the TCP/IP stack. Otherwise the message goes the normal way. The verdict is always SK_PASS: a
// missing peer never drops data.
//
// Byte order within a connection: a socket that has sent anything the normal way (its peer was not
// recorded yet, e.g. sent in the instant between the two ends reaching ESTABLISHED) is marked in
// legation_unspliced and never spliced afterwards, so spliced bytes can never overtake bytes still
// in the peer's TCP receive queue. The mark is socket-local storage: it goes with the socket.
//
// Connect-time redirection (attached only with --capture, see redirect.py): legation_connect4
// (cgroup/connect4) rewrites an app's connect() to a service's virtual IP and port, in a pod
// listed in legation_pods, to 127.0.0.1:<the pod's sidecar outbound port>, keeping the original
// destination under the socket's cookie; legation_sockops moves it, once the connection is
// established, under the app's own address and port; legation_getsockopt (cgroup/getsockopt)
// answers the sidecar's SO_ORIGINAL_DST from there (once) when no NAT took place (conntrack has
// no answer, or only the socket's own address). No NAT means the app's and the sidecar's 4-tuples
// mirror, so that hop is spliced too. The sidecar's own connections (its group id) and anything
// not listed are left alone, except: a sidecar's (or the gateway's) connect to a pod's captured
// app port goes to that pod's inbound port instead of through its REDIRECT (legation_inbound), so
// sidecar -> sidecar across pods mirrors and is spliced as well.
//
// No loops; every map is bounded; the netns cookie in the key of a loopback pair keeps two
// namespaces (127.0.0.1 in each) from ever being spliced to each other.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2

struct pair_key {
	__u64 netns;
	__u32 local_ip4;   // network byte order
	__u32 remote_ip4;  // network byte order
	__u32 local_port;  // host byte order
	__u32 remote_port; // host byte order
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65535);
	__type(key, struct pair_key);
	__type(value, __u64);
} legation_pairs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u8);
} legation_unspliced SEC(".maps");

// Counters the tests and `legation up` read: sockets recorded, messages spliced to the peer,
// messages sent the normal way (no recorded peer), connects redirected to a sidecar, original
// destinations answered, connects sent straight to a pod's inbound port. Order kept in STATS of
// sockmap.py.
enum {
	STAT_RECORDED, STAT_SPLICED, STAT_PASSED, STAT_REDIRECTED, STAT_ORIGINAL, STAT_INBOUND,
	STAT_MAX
};

// connect-time redirection: per pod (network namespace cookie) its sidecar's outbound port and
// group id; the (virtual IP, port) pairs to redirect; original destinations by socket cookie
// (until established), then by the app's (namespace, address, port).
struct pod {
	__u32 outbound_port; // host byte order
	__u32 proxy_gid;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct pod);
} legation_pods SEC(".maps");

struct service_key {
	__u32 ip4;  // network byte order
	__u32 port; // host byte order
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct service_key);
	__type(value, __u8);
} legation_services SEC(".maps");

// a pod's (address, app port) -> its sidecar's inbound port (host byte order), for the sidecars'
// and the gateway's connects to a captured app port
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct service_key);
	__type(value, __u32);
} legation_inbound SEC(".maps");

struct origin {
	__u32 ip4;  // network byte order
	__u16 port; // network byte order
	__u16 pad;
};

struct endpoint_key {
	__u64 netns;
	__u32 ip4;  // network byte order
	__u32 port; // host byte order
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct origin);
} legation_origin_by_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct endpoint_key);
	__type(value, struct origin);
} legation_origin_by_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} legation_stats SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *value = bpf_map_lookup_elem(&legation_stats, &which);

	if (value)
		__sync_fetch_and_add(value, 1);
}

// The namespace part of a pair key: the namespace cookie for loopback addresses (127.0.0.1 is in
// every namespace), 0 for others (the pods' and the host's addresses are unique, so a pair may
// span namespaces: a sidecar and the next pod's sidecar, the gateway and a pod).
static __always_inline __u64 scope(void *ctx, __u32 local_ip4)
{
	return (bpf_ntohl(local_ip4) >> 24) == 127 ? bpf_get_netns_cookie(ctx) : 0;
}

// An established connecting socket: its original destination (if connect4 redirected it) moves
// from its cookie to its own address, where the sidecar's getsockopt finds it; an entry an earlier
// socket left at that address is dropped either way, so it is never answered for another.
static __always_inline void keep_origin(struct bpf_sock_ops *skops, __u64 netns)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct endpoint_key at = {.netns = netns, .ip4 = skops->local_ip4, .port = skops->local_port};
	struct origin *origin = bpf_map_lookup_elem(&legation_origin_by_cookie, &cookie);

	if (!origin) {
		bpf_map_delete_elem(&legation_origin_by_peer, &at);
		return;
	}
	bpf_map_update_elem(&legation_origin_by_peer, &at, origin, BPF_ANY);
	bpf_map_delete_elem(&legation_origin_by_cookie, &cookie);
}

SEC("sockops")
int legation_sockops(struct bpf_sock_ops *skops)
{
	struct pair_key key = {};

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != AF_INET)
		return 1;
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		keep_origin(skops, bpf_get_netns_cookie(skops));
	key.netns = scope(skops, skops->local_ip4);
	key.local_ip4 = skops->local_ip4;
	key.remote_ip4 = skops->remote_ip4;
	key.local_port = skops->local_port;
	key.remote_port = bpf_ntohl(skops->remote_port);
	if (bpf_sock_hash_update(skops, &legation_pairs, &key, BPF_NOEXIST) == 0)
		count(STAT_RECORDED);
	return 1;
}

SEC("sk_msg")
int legation_msg(struct sk_msg_md *msg)
{
	struct pair_key peer = {};
	struct bpf_sock *sk = msg->sk;

	if (msg->family != AF_INET || !sk)
		return SK_PASS;
	if (bpf_sk_storage_get(&legation_unspliced, sk, 0, 0)) {
		count(STAT_PASSED);
		return SK_PASS;
	}
	peer.netns = scope(msg, msg->local_ip4);
	peer.local_ip4 = msg->remote_ip4;
	peer.remote_ip4 = msg->local_ip4;
	peer.local_port = bpf_ntohl(msg->remote_port);
	peer.remote_port = msg->local_port;
	if (bpf_msg_redirect_hash(msg, &legation_pairs, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(STAT_SPLICED);
		return SK_PASS;
	}
	// sent the normal way: from now on this socket always is (see the top of this file)
	bpf_sk_storage_get(&legation_unspliced, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	count(STAT_PASSED);
	return SK_PASS;
}

SEC("cgroup/connect4")
int legation_connect4(struct bpf_sock_addr *ctx)
{
	struct service_key service = {};
	struct origin origin = {};
	struct pod *pod;
	__u32 *inbound;
	__u64 netns, cookie;
	int proxy;

	if (ctx->type != 1 /* SOCK_STREAM */)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	pod = bpf_map_lookup_elem(&legation_pods, &netns);
	proxy = !pod || (bpf_get_current_uid_gid() >> 32) == pod->proxy_gid;
	service.ip4 = ctx->user_ip4;
	service.port = bpf_ntohs(ctx->user_port);
	// a sidecar (or the gateway, outside the pods) calling a pod's captured app port: straight to
	// that pod's inbound port, so no REDIRECT there and the two sidecars' sockets mirror
	inbound = bpf_map_lookup_elem(&legation_inbound, &service);
	if (inbound && proxy) {
		ctx->user_port = bpf_htons(*inbound);
		count(STAT_INBOUND);
		return 1;
	}
	if (proxy || !bpf_map_lookup_elem(&legation_services, &service))
		return 1;
	origin.ip4 = ctx->user_ip4;
	origin.port = ctx->user_port;
	cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&legation_origin_by_cookie, &cookie, &origin, BPF_ANY))
		return 1; // no room: leave it to the iptables rules
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(pod->outbound_port);
	count(STAT_REDIRECTED);
	return 1;
}

#define SOL_IP 0
#define SO_ORIGINAL_DST 80

struct sockaddr_in4 {
	__u16 family;
	__u16 port; // network byte order
	__u32 addr; // network byte order
	__u8 zero[8];
};

SEC("cgroup/getsockopt")
int legation_getsockopt(struct bpf_sockopt *ctx)
{
	struct sockaddr_in4 *answer = ctx->optval;
	struct endpoint_key peer = {};
	struct bpf_sock *sk = ctx->sk;
	struct origin *origin;

	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST || !sk)
		return 1;
	if ((void *)(answer + 1) > ctx->optval_end)
		return 1;
	// conntrack's answer stands when NAT took place (the iptables path); when none did, it is
	// only this socket's own address, and the program's answer replaces it
	if (ctx->retval == 0 &&
	    (answer->addr != sk->src_ip4 || answer->port != bpf_htons(sk->src_port)))
		return 1;
	peer.netns = bpf_get_netns_cookie(ctx);
	peer.ip4 = sk->dst_ip4;
	peer.port = bpf_ntohs(sk->dst_port);
	origin = bpf_map_lookup_elem(&legation_origin_by_peer, &peer);
	if (!origin)
		return 1;
	answer->family = AF_INET;
	answer->port = origin->port;
	answer->addr = origin->ip4;
	__builtin_memset(answer->zero, 0, sizeof(answer->zero));
	ctx->optlen = sizeof(*answer);
	asm volatile("" ::: "memory"); // two 32-bit context stores, never merged into one
	ctx->retval = 0;
	bpf_map_delete_elem(&legation_origin_by_peer, &peer); // answered once, never again
	count(STAT_ORIGINAL);
	return 1;
}

char _license[] SEC("license") = "GPL";
