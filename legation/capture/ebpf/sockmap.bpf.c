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
// No loops; every map is bounded; the netns cookie in the key keeps two namespaces that use the
// same addresses (127.0.0.1 in each) from ever being spliced to each other.
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

// Counters the tests and `legation status` read: 0 sockets recorded, 1 messages spliced to the
// peer, 2 messages sent the normal way (no recorded peer).
enum { STAT_RECORDED, STAT_SPLICED, STAT_PASSED, STAT_MAX };

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

SEC("sockops")
int legation_sockops(struct bpf_sock_ops *skops)
{
	struct pair_key key = {};

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != AF_INET)
		return 1;
	key.netns = bpf_get_netns_cookie(skops);
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
	peer.netns = bpf_get_netns_cookie(msg);
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

char _license[] SEC("license") = "GPL";
