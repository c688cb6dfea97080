/**
 * The errors the client throws, and the one translation from Connect errors to them.
 *
 * A failed call throws an {@link ApptgateError} carrying the gRPC code and what the
 * server put in the `google.rpc.Status` details: the `ErrorInfo` reason (for example
 * `CONSENT_EXPIRED`), domain and metadata, the `BadRequest` field violations, the
 * `QuotaFailure` violations and the `RetryInfo` delay. A refused consent token throws its
 * subclass {@link ConsentDenied}; a contact request while the same one is pending throws
 * {@link ConsentRequestPending}.
 *
 * @module
 */

import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  QuotaFailureSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";

/** The `ErrorInfo.domain` of every error the gateway sends. */
export const DOMAIN = "apptgate.dev";

/** The `ErrorInfo` reasons of a refused consent token. */
export const CONSENT_REASONS: ReadonlySet<string> = new Set([
  "CONSENT_REQUIRED",
  "CONSENT_INVALID",
  "CONSENT_EXPIRED",
  "CONSENT_REVOKED",
]);

/** The `ErrorInfo` metadata key naming the pending consent request of an ALREADY_EXISTS. */
export const CONSENT_REQUEST_ID = "consent_request_id";

/** One bad field of a request, as named by the server's `google.rpc.BadRequest`. */
export interface FieldViolation {
  readonly field: string;
  readonly description: string;
}

/** One limit reached, as named by the server's `google.rpc.QuotaFailure`. */
export interface QuotaViolation {
  readonly subject: string;
  readonly description: string;
}

/** A failed call. `message` is the server's fixed text: it never holds personal data. */
export class ApptgateError extends Error {
  override name = "ApptgateError";

  constructor(
    /** The gRPC status code. */
    readonly code: Code,
    message: string,
    /** The `ErrorInfo` reason, or "" when the server sent none (a transport failure, a deadline). */
    readonly reason: string = "",
    /** The `ErrorInfo` domain: {@link DOMAIN} for the gateway's own errors. */
    readonly domain: string = "",
    /** The `ErrorInfo` metadata: identifiers the request carried, never personal data. */
    readonly metadata: Readonly<Record<string, string>> = {},
    /** The fields at fault, for INVALID_ARGUMENT. */
    readonly fieldViolations: readonly FieldViolation[] = [],
    /** The server's `RetryInfo` delay in milliseconds, when it sent one. */
    readonly retryDelayMs: number | undefined = undefined,
    /** How many times the request was sent. */
    readonly attempts: number = 1,
    /** The limits reached, for RESOURCE_EXHAUSTED (`QuotaFailure`). */
    readonly quotaViolations: readonly QuotaViolation[] = [],
  ) {
    super(message);
  }

  /** The code's name, as gRPC spells it: "NOT_FOUND", "PERMISSION_DENIED", … */
  get codeName(): string {
    return Code[this.code]
      .replace(/([a-z])([A-Z])/g, "$1_$2")
      .toUpperCase();
  }
}

/** A consent token was missing, malformed, expired, revoked or issued for someone else. No contact data was sent. */
export class ConsentDenied extends ApptgateError {
  override name = "ConsentDenied";
}

/**
 * A consent request for the same patient and fields is pending already (ALREADY_EXISTS): no new one was made.
 * {@link consentRequestId} names it.
 */
export class ConsentRequestPending extends ApptgateError {
  override name = "ConsentRequestPending";

  /** The partner-scoped id (`crq_…`) of the pending request. */
  get consentRequestId(): string {
    return this.metadata[CONSENT_REQUEST_ID] ?? "";
  }
}

/** Translates any error thrown by a Connect call into an {@link ApptgateError}. */
export function toApptgateError(error: unknown, attempts = 1): ApptgateError {
  const connect = ConnectError.from(error);
  const [info] = connect.findDetails(ErrorInfoSchema);
  const violations = connect
    .findDetails(BadRequestSchema)
    .flatMap((bad) => bad.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
  const quotas = connect
    .findDetails(QuotaFailureSchema)
    .flatMap((quota) => quota.violations.map((v) => ({ subject: v.subject, description: v.description })));
  const [retry] = connect.findDetails(RetryInfoSchema);
  const retryDelayMs = retry?.retryDelay
    ? Number(retry.retryDelay.seconds) * 1000 + retry.retryDelay.nanos / 1e6
    : undefined;
  const reason = info?.reason ?? "";
  const metadata: Record<string, string> = { ...(info?.metadata ?? {}) };
  const kind =
    connect.code === Code.PermissionDenied && CONSENT_REASONS.has(reason)
      ? ConsentDenied
      : connect.code === Code.AlreadyExists && metadata[CONSENT_REQUEST_ID]
        ? ConsentRequestPending
        : ApptgateError;
  return new kind(
    connect.code,
    connect.rawMessage,
    reason,
    info?.domain ?? "",
    metadata,
    violations,
    retryDelayMs,
    attempts,
    quotas,
  );
}
