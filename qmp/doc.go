// Package qmp is migctl's control plane on the wire: a server that speaks
// the QEMU Machine Protocol (QMP) as QEMU does for migration, so that
// existing QMP clients (libvirt-style tools, go-qemu, scripts) drive migctl
// unchanged, and a small client for migctl's own command line.
//
// # Protocol
//
// A client connects to a unix socket (or a loopback TCP port) and reads the
// greeting:
//
//	{"QMP":{"version":{"qemu":{"micro":0,"minor":2,"major":10},"package":"migctl"},"capabilities":["oob"]}}
//
// It must send {"execute":"qmp_capabilities"} before anything else: until
// then every other command fails with class CommandNotFound and no event is
// delivered. Requests are JSON objects {"execute": NAME, "arguments": {…},
// "id": ANY}; they need not be newline-terminated (the server splits the
// byte stream into JSON values itself). Every server message is one JSON
// object terminated by CRLF: {"return": …, "id": …} on success,
// {"error":{"class":"GenericError","desc":…}, "id": …} on failure, and
// {"event":…, "data":…, "timestamp":{"seconds":…,"microseconds":…}} for
// events. The id is echoed verbatim (any JSON value); a request that is not
// JSON gets an error without id.
//
// Commands keep QEMU's names and argument shapes (migrate, migrate-incoming,
// migrate-set-capabilities, query-migrate, migrate_cancel, …); the list is
// in [Commands]. migctl's own additions are extra commands whose names
// start with query-migctl-; no QEMU shape is changed. Events MIGRATION and
// MIGRATION_PASS are emitted, as in QEMU, only while the capability events
// is on.
//
// # Concurrency
//
// A [Server] has one goroutine per listener (accepting), two per client (a
// reader that runs that client's commands in order, and a writer that owns
// the connection's write side and drains a bounded queue), and one that
// turns the controller's events into QMP events. The server never holds
// the controller lock: it only calls [machine.Controller] methods, each of
// which takes and releases it. A client whose queue fills up (it does not
// read its events) is dropped alone; the others and any running migration
// are unaffected.
//
// The server does not own the guest or the migrations: a [Host] does.
// [GuestHost] is the host migctl serve uses: it runs outgoing migrations
// with package engine and incoming ones with package loaders on one
// guest.Guest.
package qmp
