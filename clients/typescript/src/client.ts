/**
 * A partner client of `appointments.partner.v1.PartnerAppointmentService`, speaking gRPC over
 * HTTP/2 with Connect's Node.js transport.
 *
 * It sends the partner key on every call, gives every call a deadline (10 s by default,
 * covering retries), retries UNAVAILABLE with exponential backoff and full jitter (never
 * sooner than the server's `RetryInfo` asks), walks pages for you, reads contact details
 * only with a consent token passed explicitly, and throws {@link ApptgateError}s.
 *
 * @module
 */

import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import type { Appointment } from "./gen/appointments/partner/v1/appointment_pb.js";
import type { AppointmentContact, ConsentKey } from "./gen/appointments/partner/v1/contact_pb.js";
import {
  ListAppointmentsRequestSchema,
  PartnerAppointmentService,
  type ListAppointmentsResponse,
} from "./gen/appointments/partner/v1/partner_appointment_service_pb.js";
import { toApptgateError } from "./errors.js";

/** How UNAVAILABLE is retried. `maxAttempts` counts every send, the first included. */
export interface RetryPolicy {
  readonly maxAttempts: number;
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;
  readonly multiplier: number;
}

export const DEFAULT_RETRY: RetryPolicy = { maxAttempts: 5, initialBackoffMs: 100, maxBackoffMs: 5000, multiplier: 2 };
export const DEFAULT_TIMEOUT_MS = 10_000;

export interface PartnerClientOptions {
  /** The partner listener: "host:port" for plaintext, or a URL ("https://host:port" for TLS). */
  readonly address: string;
  /** The partner key, sent as `authorization: Bearer <key>`. */
  readonly key: string;
  /** The deadline of each call in milliseconds, retries included. */
  readonly timeoutMs?: number;
  readonly retry?: RetryPolicy;
}

/** A window of appointments: those starting in [startTime, endTime). */
export interface AppointmentQuery {
  readonly startTime: Date;
  readonly endTime: Date;
  /** One practitioner's public id; omitted means every practitioner granted to you. */
  readonly practitionerId?: string;
  /** 0 or omitted means the server's default (50); at most 500. */
  readonly pageSize?: number;
}

function baseUrl(address: string): string {
  return /^https?:\/\//.test(address) ? address : `http://${address}`;
}

function bearer(key: string): Interceptor {
  return (next) => (request) => {
    request.header.set("authorization", `Bearer ${key}`);
    return next(request);
  };
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export class PartnerClient {
  private readonly sessions: Http2SessionManager;
  private readonly client: Client<typeof PartnerAppointmentService>;
  private readonly timeoutMs: number;
  private readonly retry: RetryPolicy;

  constructor(options: PartnerClientOptions) {
    if (!/^[\x21-\x7e]+$/.test(options.key)) {
      throw new Error("key must be a non-empty string of visible ASCII characters");
    }
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.retry = options.retry ?? DEFAULT_RETRY;
    const url = baseUrl(options.address);
    this.sessions = new Http2SessionManager(url);
    const transport = createGrpcTransport({
      baseUrl: url,
      sessionManager: this.sessions,
      defaultTimeoutMs: this.timeoutMs,
      interceptors: [bearer(options.key)],
    });
    this.client = createClient(PartnerAppointmentService, transport);
  }

  /** Closes the HTTP/2 connection, so the process can exit. */
  close(): void {
    this.sessions.abort();
  }

  /** Sends `call` with the time left before the deadline; retries UNAVAILABLE; throws ApptgateError. */
  private async send<T>(call: (timeoutMs: number) => Promise<T>): Promise<T> {
    const deadline = Date.now() + this.timeoutMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await call(Math.max(deadline - Date.now(), 1));
      } catch (thrown) {
        const error = toApptgateError(thrown, attempt);
        if (error.code !== Code.Unavailable || attempt >= this.retry.maxAttempts) throw error;
        const cap = Math.min(this.retry.maxBackoffMs, this.retry.initialBackoffMs * this.retry.multiplier ** (attempt - 1));
        const delay = Math.max(error.retryDelayMs ?? 0, Math.random() * cap);
        if (Date.now() + delay >= deadline) throw error;
        await sleep(delay);
      }
    }
  }

  /** One page of the appointments starting in the window, in the basic view. */
  listAppointments(query: AppointmentQuery & { readonly pageToken?: string }): Promise<ListAppointmentsResponse> {
    const request = create(ListAppointmentsRequestSchema, {
      practitionerId: query.practitionerId ?? "",
      startTime: timestampFromDate(query.startTime),
      endTime: timestampFromDate(query.endTime),
      pageSize: query.pageSize ?? 0,
      pageToken: query.pageToken ?? "",
    });
    return this.send((timeoutMs) => this.client.listAppointments(request, { timeoutMs }));
  }

  /** Every appointment of the window, ordered by start time, fetching pages as needed. */
  async *iterAppointments(query: AppointmentQuery): AsyncGenerator<Appointment> {
    let pageToken = "";
    do {
      const page = await this.listAppointments({ ...query, pageToken });
      yield* page.appointments;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** One appointment in the basic view; NOT_FOUND when it does not exist or is not visible to you. */
  getAppointment(appointmentId: string): Promise<Appointment> {
    return this.send((timeoutMs) => this.client.getAppointment({ appointmentId }, { timeoutMs }));
  }

  /**
   * The contact details that `consentToken` releases for this appointment's patient: only the consented
   * fields are set, the others are listed in `withheldFields`. Throws ConsentDenied when the token does not
   * allow it.
   */
  getAppointmentContact(appointmentId: string, consentToken: string): Promise<AppointmentContact> {
    return this.send((timeoutMs) => this.client.getAppointmentContact({ appointmentId, consentToken }, { timeoutMs }));
  }

  /** The public keys (PASERK k4.public) that verify consent tokens, the active one first. */
  async listConsentKeys(): Promise<ConsentKey[]> {
    const reply = await this.send((timeoutMs) => this.client.listConsentKeys({}, { timeoutMs }));
    return reply.keys;
  }
}
