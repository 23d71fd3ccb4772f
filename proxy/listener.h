/*
 * listener.h - listening sockets and the accept path (caps, EMFILE).
 */
#ifndef SMTPBRIDGE_LISTENER_H
#define SMTPBRIDGE_LISTENER_H

#include "runtime.h"

/* Starts accepting on every socket of rt. */
void listener_start(struct runtime *rt);

/* Stops accepting (sockets stay open until the runtime is freed). */
void listener_stop(struct runtime *rt);

/* Stops accepting and closes the listening sockets (drain: new connections
 * are refused at once instead of waiting in the backlog). */
void listener_close(struct runtime *rt);

#endif
