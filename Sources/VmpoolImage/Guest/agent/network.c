// vmpool guest agent, interface configuration over rtnetlink (see agent.h).
#include "agent.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/ethernet.h>
#include <net/if_arp.h>
#include <netpacket/packet.h>
#include <sys/socket.h>

// ---------------------------------------------------------------------------------------------
// Network configuration over rtnetlink: IFACE,MAC,ADDR/PREFIX,GATEWAY|-

int parse_net(const char *text, struct netconf *nc) {
    char buf[160];
    if (strlen(text) >= sizeof buf) return -1;
    strcpy(buf, text);
    char *fields[4];
    char *s = buf;
    for (int i = 0; i < 4; i++) {
        fields[i] = s;
        char *comma = strchr(s, ',');
        if (i < 3) {
            if (!comma) return -1;
            *comma = 0;
            s = comma + 1;
        } else if (comma) {
            return -1;
        }
    }
    size_t ilen = strlen(fields[0]);
    if (ilen == 0 || ilen >= IF_NAMESIZE) return -1;
    for (size_t i = 0; i < ilen; i++) {
        unsigned char c = (unsigned char)fields[0][i];
        if (c <= ' ' || c == '/' || c == ':' || c >= 0x7f) return -1;
    }
    strcpy(nc->iface, fields[0]);
    const char *m = fields[1];
    if (strlen(m) != 17) return -1;
    for (int i = 0; i < 6; i++) {
        int hi = hexval(m[3 * i]), lo = hexval(m[3 * i + 1]);
        if (hi < 0 || lo < 0 || (i < 5 && m[3 * i + 2] != ':')) return -1;
        nc->mac[i] = (unsigned char)(hi << 4 | lo);
    }
    if (nc->mac[0] & 1) return -1;  // multicast
    nc->has_address = strcmp(fields[2], "-") != 0;
    if (!nc->has_address) {
        nc->prefix = 0;
        nc->has_gateway = 0;
        return strcmp(fields[3], "-") == 0 ? 0 : -1;
    }
    char *slash = strchr(fields[2], '/');
    if (!slash) return -1;
    *slash = 0;
    if (inet_pton(AF_INET, fields[2], &nc->addr) != 1) return -1;
    const char *pfx = slash + 1;
    if (!isdigit((unsigned char)pfx[0]) || (pfx[1] && (!isdigit((unsigned char)pfx[1]) || pfx[2]))) return -1;
    nc->prefix = atoi(pfx);
    if (nc->prefix > 32) return -1;
    nc->has_gateway = strcmp(fields[3], "-") != 0;
    if (nc->has_gateway && inet_pton(AF_INET, fields[3], &nc->gateway) != 1) return -1;
    return 0;
}

struct nlreq {
    struct nlmsghdr h;
    union {
        struct ifinfomsg link;
        struct ifaddrmsg addr;
        struct rtmsg route;
    } u;
    char attrs[128];
};

static void nl_attr(struct nlreq *r, unsigned short type, const void *data, size_t len) {
    struct rtattr *a = (struct rtattr *)((char *)r + NLMSG_ALIGN(r->h.nlmsg_len));
    a->rta_type = type;
    a->rta_len = (unsigned short)RTA_LENGTH(len);
    memcpy(RTA_DATA(a), data, len);
    r->h.nlmsg_len = NLMSG_ALIGN(r->h.nlmsg_len) + RTA_ALIGN(a->rta_len);
}

static unsigned nl_seq;

// Sends one request and waits for its acknowledgement; 0 or an errno value.
static int nl_talk(int fd, struct nlreq *r) {
    r->h.nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
    r->h.nlmsg_seq = ++nl_seq;
    if (send(fd, r, r->h.nlmsg_len, 0) < 0) return errno;
    char buf[8192] __attribute__((aligned(4)));
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != r->h.nlmsg_seq) continue;
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                return -e->error;
            }
        }
    }
}

static void nl_init(struct nlreq *r, unsigned short type, unsigned short flags, size_t body) {
    memset(r, 0, sizeof *r);
    r->h.nlmsg_len = NLMSG_LENGTH(body);
    r->h.nlmsg_type = type;
    r->h.nlmsg_flags = flags;
}

// Sets the link up (`up` 1) or down (0) and, with `mac`, its address, in one request; `up`
// -1 leaves the link's state alone.
static int link_set(int fd, int index, int up, const unsigned char *mac) {
    struct nlreq r;
    nl_init(&r, RTM_NEWLINK, 0, sizeof(struct ifinfomsg));
    r.u.link.ifi_family = AF_UNSPEC;
    r.u.link.ifi_index = index;
    if (mac) nl_attr(&r, IFLA_ADDRESS, mac, 6);
    if (up >= 0) {
        r.u.link.ifi_change = IFF_UP;
        r.u.link.ifi_flags = up ? IFF_UP : 0;
    }
    return nl_talk(fd, &r);
}

// Removes every IPv4 address of interface `index` but `keep` (when given and present, which
// sets `*kept`): a clone of a user-mode template already has its address, and re-adding it
// costs more than the rest of the configuration under TCG.
static int flush_addresses(int fd, int index, const struct in_addr *keep, int keep_prefix, int *kept) {
    *kept = 0;
    struct {
        unsigned char prefix;
        struct in_addr local;
        int has_local;
    } found[64];
    int count = 0;
    struct nlreq r;
    nl_init(&r, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, sizeof(struct ifaddrmsg));
    r.u.addr.ifa_family = AF_INET;
    r.h.nlmsg_seq = ++nl_seq;
    if (send(fd, &r, r.h.nlmsg_len, 0) < 0) return errno;
    char buf[16384] __attribute__((aligned(4)));
    for (int done = 0; !done;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (n == 0) break;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != r.h.nlmsg_seq) continue;
            if (h->nlmsg_type == NLMSG_DONE) {
                done = 1;
                break;
            }
            if (h->nlmsg_type == NLMSG_ERROR) return -((struct nlmsgerr *)NLMSG_DATA(h))->error;
            if (h->nlmsg_type != RTM_NEWADDR) continue;
            struct ifaddrmsg *ifa = NLMSG_DATA(h);
            if ((int)ifa->ifa_index != index || ifa->ifa_family != AF_INET || count == 64) continue;
            found[count].prefix = ifa->ifa_prefixlen;
            found[count].has_local = 0;
            int len = (int)IFA_PAYLOAD(h);
            for (struct rtattr *a = IFA_RTA(ifa); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
                if ((a->rta_type == IFA_LOCAL || (a->rta_type == IFA_ADDRESS && !found[count].has_local)) &&
                    RTA_PAYLOAD(a) == 4) {
                    memcpy(&found[count].local, RTA_DATA(a), 4);
                    found[count].has_local = 1;
                }
            }
            if (found[count].has_local) count++;
        }
    }
    for (int i = 0; i < count; i++) {
        if (keep && found[i].local.s_addr == keep->s_addr && found[i].prefix == keep_prefix) {
            *kept = 1;
            continue;
        }
        nl_init(&r, RTM_DELADDR, 0, sizeof(struct ifaddrmsg));
        r.u.addr.ifa_family = AF_INET;
        r.u.addr.ifa_prefixlen = found[i].prefix;
        r.u.addr.ifa_index = (unsigned)index;
        nl_attr(&r, IFA_LOCAL, &found[i].local, 4);
        int e = nl_talk(fd, &r);
        if (e && e != EADDRNOTAVAIL) return e;
    }
    return 0;
}

static int add_address(int fd, int index, struct in_addr addr, int prefix) {
    struct nlreq r;
    nl_init(&r, RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, sizeof(struct ifaddrmsg));
    r.u.addr.ifa_family = AF_INET;
    r.u.addr.ifa_prefixlen = (unsigned char)prefix;
    r.u.addr.ifa_scope = RT_SCOPE_UNIVERSE;
    r.u.addr.ifa_index = (unsigned)index;
    nl_attr(&r, IFA_LOCAL, &addr, 4);
    nl_attr(&r, IFA_ADDRESS, &addr, 4);
    if (prefix < 31) {
        uint32_t mask = prefix == 0 ? 0 : htonl(~((1u << (32 - prefix)) - 1));
        struct in_addr brd = {.s_addr = addr.s_addr | ~mask};
        nl_attr(&r, IFA_BROADCAST, &brd, 4);
    }
    return nl_talk(fd, &r);
}

static int replace_default_route(int fd, int index, struct in_addr gateway) {
    struct nlreq r;
    nl_init(&r, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, sizeof(struct rtmsg));
    r.u.route.rtm_family = AF_INET;
    r.u.route.rtm_table = RT_TABLE_MAIN;
    r.u.route.rtm_protocol = RTPROT_BOOT;
    r.u.route.rtm_scope = RT_SCOPE_UNIVERSE;
    r.u.route.rtm_type = RTN_UNICAST;
    nl_attr(&r, RTA_GATEWAY, &gateway, 4);
    nl_attr(&r, RTA_OIF, &index, 4);
    return nl_talk(fd, &r);
}

// Announces a new address (gratuitous ARP request), so that the bridge and peers learn at once
// where it is now (a stopped VM may have had it, behind another tap). Best effort.
void announce(int index, const unsigned char *mac, struct in_addr addr) {
    int fd = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, htons(ETH_P_ARP));
    if (fd < 0) return;
    unsigned char arp[28];
    struct arphdr *h = (struct arphdr *)arp;
    h->ar_hrd = htons(ARPHRD_ETHER);
    h->ar_pro = htons(ETH_P_IP);
    h->ar_hln = 6;
    h->ar_pln = 4;
    h->ar_op = htons(ARPOP_REQUEST);
    memcpy(arp + 8, mac, 6);
    memcpy(arp + 14, &addr, 4);
    memset(arp + 18, 0, 6);
    memcpy(arp + 24, &addr, 4);
    struct sockaddr_ll to = {0};
    to.sll_family = AF_PACKET;
    to.sll_protocol = htons(ETH_P_ARP);
    to.sll_ifindex = index;
    to.sll_halen = 6;
    memset(to.sll_addr, 0xff, 6);
    sendto(fd, arp, sizeof arp, MSG_DONTWAIT, (struct sockaddr *)&to, sizeof to);
    close(fd);
}

// Configures the interface; when the address is new to it, `*announce_at` is set to the
// interface's index and the caller announces the address (`announce`) once it has answered:
// peers learn the MAC a little later, the clone is not held up for it.
int configure_net(const struct netconf *nc, int *announce_at, char *err, size_t errlen) {
    *announce_at = 0;
    int index = (int)if_nametoindex(nc->iface);
    if (index == 0) {
        snprintf(err, errlen, "net: no interface %s", nc->iface);
        return -1;
    }
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) {
        snprintf(err, errlen, "net: netlink: %s", strerror(errno));
        return -1;
    }
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    const char *step = "set MAC, link up";
    // virtio-net changes its MAC while up (IFF_LIVE_ADDR_CHANGE): a clone of a template whose
    // link was up already keeps its rx rings, which a down/up would rebuild (costly under
    // TCG). Devices that refuse get the down, MAC, up sequence.
    int e = link_set(fd, index, 1, nc->mac);
    if (e == EBUSY) {
        if ((e = link_set(fd, index, 0, NULL))) step = "link down";
        else if ((e = link_set(fd, index, -1, nc->mac))) step = "set MAC";
        else if ((e = link_set(fd, index, 1, NULL))) step = "link up";
    }
    int kept = 0;
    if (!e && (e = flush_addresses(fd, index, nc->has_address ? &nc->addr : NULL, nc->prefix, &kept)))
        step = "flush addresses";
    if (!e && nc->has_address && !kept && (e = add_address(fd, index, nc->addr, nc->prefix))) step = "add address";
    if (!e && nc->has_gateway && (e = replace_default_route(fd, index, nc->gateway))) step = "default route";
    close(fd);
    if (e) {
        snprintf(err, errlen, "net: %s %s: %s", step, nc->iface, strerror(e));
        return -1;
    }
    if (nc->has_address && !kept) *announce_at = index;
    return 0;
}
