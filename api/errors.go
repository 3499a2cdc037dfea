package api

import (
	"errors"
	"strconv"

	"github.com/gofiber/fiber/v2"

	"github.com/kmsgate/kmsgate/appliance/store"
	"github.com/kmsgate/kmsgate/appliance/tenants"
	"github.com/kmsgate/kmsgate/internal/errs"
	"github.com/kmsgate/kmsgate/metrics"
)

// Problem is the error body of every failed request: a human message and a stable code that
// clients can switch on.
type Problem struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// apiError is an error that already knows its HTTP status and code.
type apiError struct {
	status int
	code   string
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func problem(status int, code, msg string) error {
	return &apiError{status: status, code: code, msg: msg}
}

// storeRetryAfter is the Retry-After, in seconds, of a store_unavailable answer.
const storeRetryAfter = 5

var kindStatus = map[errs.Kind]struct {
	status int
	code   string
}{
	errs.NotFound:     {fiber.StatusNotFound, "not_found"},
	errs.NotSupported: {fiber.StatusMethodNotAllowed, "not_supported"},
	errs.Unavailable:  {fiber.StatusServiceUnavailable, "unavailable"},
	errs.Throttled:    {fiber.StatusServiceUnavailable, "throttled"},
	errs.BadInput:     {fiber.StatusBadRequest, "bad_request"},
	errs.Conflict:     {fiber.StatusConflict, "conflict"},
	errs.Forbidden:    {fiber.StatusForbidden, "forbidden"},
}

// errorHandler turns any error into a JSON problem. Unclassified errors are logged with their cause
// and answered with a generic 500: a backend's internals never reach the caller.
func (s *Server) errorHandler(c *fiber.Ctx, err error) error {
	status, code, msg := fiber.StatusInternalServerError, "internal", "internal error"
	var ae *apiError
	var fe *fiber.Error
	var pe *errs.Error
	switch {
	case errors.As(err, &ae):
		status, code, msg = ae.status, ae.code, ae.msg
	case store.IsUnavailable(err):
		// Checked before the outermost kind: a layer may have wrapped the store's failure in an
		// error of its own, and the caller should still learn that retrying later helps.
		status, code, msg = fiber.StatusServiceUnavailable, store.CodeUnavailable, "the store is unavailable; retry later"
		c.Set(fiber.HeaderRetryAfter, strconv.Itoa(storeRetryAfter))
	case errors.As(err, &pe) && pe.Kind != errs.Internal:
		ks := kindStatus[pe.Kind]
		status, code, msg = ks.status, ks.code, errs.PublicMessage(err)
		if pe.Code != "" {
			code = pe.Code
		}
		if ra := errs.RetryAfterOf(err); ra > 0 || pe.Kind == errs.Throttled || pe.Kind == errs.Unavailable {
			secs := int(ra.Seconds() + 0.999)
			if secs < 1 {
				secs = 1
			}
			c.Set(fiber.HeaderRetryAfter, strconv.Itoa(secs))
		}
	case errors.Is(err, tenants.ErrTenantNotFound):
		status, code, msg = fiber.StatusNotFound, "tenant_not_found", err.Error()
	case errors.As(err, &fe):
		status, msg = fe.Code, fe.Message
		code = fiberCode(fe.Code)
	default:
		s.log.Error("request failed", "method", metrics.HTTPMethod(c.Method()), "route", s.routes[c.Route().Path], "error", err)
	}
	return c.Status(status).JSON(Problem{Error: msg, Code: code})
}

func fiberCode(status int) string {
	switch status {
	case fiber.StatusNotFound:
		return "route_not_found"
	case fiber.StatusMethodNotAllowed:
		return "method_not_allowed"
	case fiber.StatusRequestEntityTooLarge:
		return "body_too_large"
	case fiber.StatusUnsupportedMediaType:
		return "unsupported_media_type"
	case fiber.StatusBadRequest:
		return "bad_request"
	case fiber.StatusRequestTimeout:
		return "timeout"
	case fiber.StatusUnauthorized:
		return "unauthorized"
	case fiber.StatusForbidden:
		return "forbidden"
	}
	if status >= 500 {
		return "internal"
	}
	return "error"
}
