//go:build mutant_resume_after_commit

package mutant

func init() { ResumeAfterCommit = true; Active = append(Active, "mutant_resume_after_commit") }
