/* strata — admission: who is connected, and how many handshakes run.
 *
 * A peer is a source address (TCP: the IP address, any port; IPv4-mapped
 * IPv6 addresses count as IPv4) or a user (unix sockets: the peer's uid
 * from SO_PEERCRED).  Three limits keep one peer from crowding out the
 * rest, and keep slow handshakes from taking every connection slot:
 *   max_per_peer             connections of one peer at once;
 *   max_handshakes_per_peer  of those, still in the handshake;
 *   max_handshakes           handshakes of everyone at once: past it the
 *                            listeners stop accepting (new clients wait in
 *                            the kernel's backlog) until one finishes, so
 *                            handshakes under way are finished before new
 *                            ones are started.
 * A connection past a per-peer limit is closed at once (logged); the
 * handshake timeout bounds how long a slot can be held without progress.
 *
 * Loop thread only.  The peer table is a list: it holds at most
 * max_connections entries and is searched once per accepted client.
 */
#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "conn.h"
#include "log.h"
#include "server.h"

struct peer {
    struct peer *next;
    int family;                /* AF_INET, AF_INET6 or AF_UNIX */
    uint8_t addr[16];          /* v4 in the first 4 bytes; unix: the uid */
    unsigned n_conns;
    unsigned n_handshakes;
    char desc[INET6_ADDRSTRLEN + 8];
};

const char *peer_desc(const struct peer *p)
{
    return p ? p->desc : "?";
}

/* Fills the key of fd's peer; false when it cannot be told (then the
 * client gets a peer of its own kind with an all-zero key). */
static bool peer_key(int fd, bool tcp, struct peer *k)
{
    memset(k, 0, sizeof(*k));
    if (!tcp) {
        struct ucred cr;
        socklen_t len = sizeof(cr);
        k->family = AF_UNIX;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0) {
            snprintf(k->desc, sizeof(k->desc), "uid ?");
            return false;
        }
        memcpy(k->addr, &cr.uid, sizeof(cr.uid));
        snprintf(k->desc, sizeof(k->desc), "uid %u", (unsigned)cr.uid);
        return true;
    }
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getpeername(fd, (struct sockaddr *)&ss, &len) < 0) {
        k->family = AF_INET;
        snprintf(k->desc, sizeof(k->desc), "?");
        return false;
    }
    if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&ss;
        if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
            k->family = AF_INET;
            memcpy(k->addr, &s6->sin6_addr.s6_addr[12], 4);
        } else {
            k->family = AF_INET6;
            memcpy(k->addr, &s6->sin6_addr, 16);
        }
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)&ss;
        k->family = AF_INET;
        memcpy(k->addr, &s4->sin_addr, 4);
    }
    inet_ntop(k->family, k->addr, k->desc, sizeof(k->desc));
    return true;
}

enum admit_verdict peer_admit(struct server *srv, int fd, bool tcp,
                              struct peer **out)
{
    struct peer k;
    peer_key(fd, tcp, &k);
    struct peer *p = srv->peers;
    while (p && !(p->family == k.family && !memcmp(p->addr, k.addr, 16)))
        p = p->next;
    *out = p; /* refused or not: who it is, for the caller's messages */
    if (p && p->n_conns >= srv->cfg.max_per_peer)
        return ADMIT_PEER_FULL;
    if (p && p->n_handshakes >= srv->cfg.max_handshakes_per_peer)
        return ADMIT_PEER_HANDSHAKES;
    if (!p) {
        p = malloc(sizeof(*p));
        if (!p)
            return ADMIT_NOMEM;
        *p = k;
        p->next = srv->peers;
        srv->peers = p;
    }
    p->n_conns++;
    p->n_handshakes++;
    srv->n_handshaking++;
    *out = p;
    return ADMIT_OK;
}

const char *admit_verdict_str(enum admit_verdict v)
{
    switch (v) {
    case ADMIT_OK:
        return "admitted";
    case ADMIT_PEER_FULL:
        return "it has as many connections as --max-connections-per-peer allows";
    case ADMIT_PEER_HANDSHAKES:
        return "it has as many handshakes in progress as "
               "--max-handshakes-per-peer allows";
    case ADMIT_NOMEM:
        return "out of memory";
    }
    return "?";
}

void peer_handshake_done(struct server *srv, struct peer *p)
{
    assert(p->n_handshakes > 0 && srv->n_handshaking > 0);
    p->n_handshakes--;
    srv->n_handshaking--;
    server_listeners_rearm(srv); /* accepting may have paused */
}

void peer_release(struct server *srv, struct peer *p, bool in_handshake)
{
    if (in_handshake)
        peer_handshake_done(srv, p);
    assert(p->n_conns > 0);
    if (--p->n_conns > 0)
        return;
    for (struct peer **pp = &srv->peers; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    free(p);
}

void peers_free(struct server *srv)
{
    while (srv->peers) {
        struct peer *p = srv->peers;
        srv->peers = p->next;
        free(p);
    }
}
