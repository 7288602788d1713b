package qmp_test

import (
	"fmt"

	"github.com/migctl/migctl/qmp"
	"github.com/migctl/migctl/transport"
)

// What a client of an unauthenticated TCP control socket may migrate to,
// and what the unix socket's owner may.
func ExamplePolicy_Check() {
	pol := qmp.Policy{MigrationDir: "/srv/mig"}
	for _, uri := range []string{"tcp:10.0.0.2:4444", "file:/srv/mig/guest.mig", "file:/etc/passwd", "exec:cat > /tmp/x", "fd:migfd", "fd:7"} {
		a, _ := transport.Parse(uri)
		local := "allowed"
		if err := pol.Check(qmp.LocalUser, "migrate", a); err != nil {
			local = "refused"
		}
		owner := "allowed"
		if err := pol.Check(qmp.Owner, "migrate", a); err != nil {
			owner = "refused"
		}
		fmt.Printf("%-24s local user: %s, owner: %s\n", uri, local, owner)
	}
	// Output:
	// tcp:10.0.0.2:4444        local user: allowed, owner: allowed
	// file:/srv/mig/guest.mig  local user: allowed, owner: allowed
	// file:/etc/passwd         local user: refused, owner: allowed
	// exec:cat > /tmp/x        local user: refused, owner: allowed
	// fd:migfd                 local user: allowed, owner: allowed
	// fd:7                     local user: refused, owner: allowed
}
