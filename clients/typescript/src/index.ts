/**
 * The apptgate partner client for TypeScript (Node.js): {@link PartnerClient}, its errors, and the
 * generated messages of `appointments.partner.v1` and `appointments.type.v1`.
 *
 * @module
 */

export {
  DEFAULT_RETRY,
  DEFAULT_TIMEOUT_MS,
  PartnerClient,
  type AppointmentQuery,
  type PartnerClientOptions,
  type RetryPolicy,
} from "./client.js";
export { ApptgateError, CONSENT_REASONS, ConsentDenied, DOMAIN, toApptgateError, type FieldViolation } from "./errors.js";
export * from "./gen/appointments/partner/v1/appointment_pb.js";
export * from "./gen/appointments/partner/v1/contact_pb.js";
export * from "./gen/appointments/partner/v1/partner_appointment_service_pb.js";
export * from "./gen/appointments/type/v1/contact_pb.js";
