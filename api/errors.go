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

// apiError is an error that already knows its HTTP status and code. path and issue, when set,
// place a 400 at a member of the request body (the /key-chain face reports them).
type apiError struct {
	status int
	code   string
	msg    string
	path   []any
	issue  string
	keys   []string
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

// classified is what an error answers: status, stable code and caller-safe message, the
// Retry-After (seconds, 0: none) and whether the cause must be logged (an unclassified error).
type classified struct {
	status     int
	code, msg  string
	retryAfter int
	logCause   bool
}

// classify maps an error to its answer without side effects, so the /key-chain face can decide on
// its body before anything is written or logged.
func classify(err error) classified {
	var ae *apiError
	var fe *fiber.Error
	var pe *errs.Error
	switch {
	case errors.As(err, &ae):
		return classified{status: ae.status, code: ae.code, msg: ae.msg}
	case store.IsUnavailable(err):
		// Checked before the outermost kind: a layer may have wrapped the store's failure in an
		// error of its own, and the caller should still learn that retrying later helps.
		return classified{status: fiber.StatusServiceUnavailable, code: store.CodeUnavailable,
			msg: "the store is unavailable; retry later", retryAfter: storeRetryAfter}
	case errors.As(err, &pe) && pe.Kind != errs.Internal:
		ks := kindStatus[pe.Kind]
		cl := classified{status: ks.status, code: ks.code, msg: errs.PublicMessage(err)}
		if pe.Code != "" {
			cl.code = pe.Code
		}
		if ra := errs.RetryAfterOf(err); ra > 0 || pe.Kind == errs.Throttled || pe.Kind == errs.Unavailable {
			cl.retryAfter = max(int(ra.Seconds()+0.999), 1)
		}
		return cl
	case errors.Is(err, tenants.ErrTenantNotFound):
		return classified{status: fiber.StatusNotFound, code: "tenant_not_found", msg: err.Error()}
	case errors.As(err, &fe):
		return classified{status: fe.Code, code: fiberCode(fe.Code), msg: fe.Message}
	}
	return classified{status: fiber.StatusInternalServerError, code: "internal", msg: "internal error", logCause: true}
}

// errorHandler turns any error into a JSON problem. Unclassified errors are logged with their cause
// and answered with a generic 500: a backend's internals never reach the caller.
func (s *Server) errorHandler(c *fiber.Ctx, err error) error {
	cl := classify(err)
	s.answered(c, cl, err)
	return c.Status(cl.status).JSON(Problem{Error: cl.msg, Code: cl.code})
}

// answered does what every error answer does besides its body: Retry-After, and the log line of
// an unclassified error.
func (s *Server) answered(c *fiber.Ctx, cl classified, err error) {
	if cl.retryAfter > 0 {
		c.Set(fiber.HeaderRetryAfter, strconv.Itoa(cl.retryAfter))
	}
	if cl.logCause {
		s.log.Error("request failed", "method", metrics.HTTPMethod(c.Method()), "route", s.routes[c.Route().Path], "error", err)
	}
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
