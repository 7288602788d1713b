//go:build mutant_switchover_ack

package mutant

func init() { SkipSwitchoverAckWait = true; Active = append(Active, "mutant_switchover_ack") }
