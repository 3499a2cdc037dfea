package keychain

import (
	"unicode/utf8"
)

func validateDescription(d *string) error {
	if d == nil {
		return nil
	}
	if !utf8.ValidString(*d) || utf8.RuneCountInString(*d) > MaxDescriptionLen {
		return badField(IssueTooBig, []any{"description"}, "validation_failed",
			"description must be valid UTF-8 of at most %d characters", MaxDescriptionLen)
	}
	return nil
}

func validateUsage(u string) error {
	if !ValidUsageType(u) {
		return badField(IssueInvalidValue, []any{"usageType"}, "validation_failed",
			"usageType must be one of access, attestation, trustList, statusList, encrypt (got %q)", u)
	}
	return nil
}

func validatePolicy(p *PolicyInput, requireEnabled bool) error {
	if p == nil {
		return nil
	}
	if requireEnabled && p.Enabled == nil {
		return badField(IssueInvalidType, []any{"rotationPolicy", "enabled"}, "validation_failed",
			"rotationPolicy.enabled is required")
	}
	// In member order, so the first failure reported is always the same one.
	for _, m := range []struct {
		name string
		v    *int
	}{{"intervalDays", p.IntervalDays}, {"certValidityDays", p.CertValidityDays}} {
		if m.v == nil || (*m.v >= MinDays && *m.v <= MaxDays) {
			continue
		}
		issue := IssueTooBig
		if *m.v < MinDays {
			issue = IssueTooSmall
		}
		return badField(issue, []any{"rotationPolicy", m.name}, "validation_failed",
			"rotationPolicy.%s must be between %d and %d (got %d)", m.name, MinDays, MaxDays, *m.v)
	}
	return nil
}

func (p *PolicyInput) apply(dst *Policy) {
	if p == nil {
		return
	}
	if p.Enabled != nil {
		dst.Enabled = *p.Enabled
	}
	if p.IntervalDays != nil {
		dst.IntervalDays = *p.IntervalDays
	}
	if p.CertValidityDays != nil {
		dst.CertValidityDays = *p.CertValidityDays
	}
}
