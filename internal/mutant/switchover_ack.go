//go:build mutant_switchover_ack

package mutant

func init() { SkipSwitchoverAckWait = true }
