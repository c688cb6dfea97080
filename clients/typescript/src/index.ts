/**
 * The apptgate partner client for TypeScript (Node.js): {@link PartnerClient}, its errors, its resumable
 * watches, and the generated messages of `appointments.partner.v1` and `appointments.type.v1`.
 *
 * @module
 */

export {
  DEFAULT_RETRY,
  DEFAULT_TIMEOUT_MS,
  KEEPALIVE_INTERVAL_MS,
  PartnerClient,
  type AppointmentQuery,
  type AppointmentWatchOptions,
  type ConsentRequestWatchOptions,
  type PartnerClientOptions,
  type RetryEvent,
  type RetryPolicy,
} from "./client.js";
export {
  ApptgateError,
  CONSENT_REASONS,
  CONSENT_REQUEST_ID,
  ConsentDenied,
  ConsentRequestPending,
  DOMAIN,
  toApptgateError,
  type FieldViolation,
  type QuotaViolation,
} from "./errors.js";
export {
  DEFAULT_RESUME_TIMEOUT_MS,
  ResumableWatch,
  SERVER_SHUTTING_DOWN,
  STREAM_TOO_SLOW,
  resumable,
  type ResumeOptions,
  type StreamOpener,
} from "./watch.js";
export * from "./gen/appointments/partner/v1/appointment_pb.js";
export * from "./gen/appointments/partner/v1/consent_request_pb.js";
export * from "./gen/appointments/partner/v1/contact_pb.js";
export * from "./gen/appointments/partner/v1/partner_appointment_service_pb.js";
export * from "./gen/appointments/type/v1/contact_pb.js";
